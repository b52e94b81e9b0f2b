//! Three replicas of the control plane on one PostgreSQL and one Mosquitto, with real agents: a
//! staged rollout completes while the replica driving it is killed with SIGKILL; no device is
//! offered twice, every acknowledgement lands, and the API answers through the survivors
//! throughout.
//!
//! Replica r0 runs in this process (the harness's server, API and device messages only:
//! `--no-workers`); r1 and r2 are `flotilla-server` processes that also drive the work.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_demo::{Fleet, FleetOptions, digits};
use flotilla_server::store::LeaseStore;
use flotilla_server::store::postgres::Postgres;
use flotilla_tests::{start_mosquitto_tls, start_postgres};

/// The `flotilla-server` binary of this build (built here if `cargo test` did not build it).
fn server_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join("flotilla-server");
    if !bin.exists() {
        let ok = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "flotilla-server", "--bin", "flotilla-server"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok && bin.exists(), "could not build {}", bin.display());
    }
    bin
}

fn kill(child: &mut std::process::Child) {
    // SIGKILL: no shutdown, no lease given back, nothing flushed.
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_survives_the_replica_driving_it() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_postgres(&dir.path().join("pg"));
    let store_url = pg.create_database("fleet");
    let data = dir.path().join("fleet/server");
    let (_broker, broker_url) = start_mosquitto_tls(dir.path(), &data);
    let opts = FleetOptions {
        external_broker: Some(broker_url),
        store: Some(store_url.clone()),
        replica_id: Some("r0".into()),
        workers: false,
        ..FleetOptions::default()
    };
    let fleet = Fleet::start_with(&dir.path().join("fleet"), 6, opts).await.unwrap();
    let bin = server_bin();
    let (mut r1, api1) = fleet.spawn_replica(&bin, "r1").await.unwrap();
    let (mut r2, api2) = fleet.spawn_replica(&bin, "r2").await.unwrap();
    let mut replicas = vec![("r1", &mut r1, api1), ("r2", &mut r2, api2)];

    // Every replica sees the same registry.
    let ca = fleet.server.ca_path();
    let http = flotilla_demo::authorized_client(&fleet.token, ca.as_deref()).unwrap();
    for (_, _, api) in &replicas {
        let devices: Vec<serde_json::Value> =
            http.get(format!("{api}/api/v1/devices")).send().await.unwrap().json().await.unwrap();
        assert_eq!(devices.len(), 6, "{api}: {devices:?}");
    }

    // A staged rollout with a bake, so it lasts long enough to lose its driver midway.
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..1])).unwrap()).await.unwrap();
    let plan = serde_json::json!({"waves": ["2", "100%"], "bake_secs": 3, "gates": ["install_success>=1"]});
    let id = fleet.start_rollout_with("digits@1", plan).await.unwrap();

    // Find the replica driving it (the lease holder) and kill it once the first wave is offered.
    let store = Postgres::connect(&store_url).await.unwrap();
    let lease = format!("rollout/{id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (holder, epoch) = loop {
        let r = fleet.rollout(&id).await.unwrap();
        if let Some(l) = store.lease(&lease).await.unwrap()
            && r.offered + r.succeeded > 0
        {
            break (l.holder, l.epoch);
        }
        assert!(Instant::now() < deadline, "the rollout did not start: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(holder, "r0", "r0 runs no workers");
    let i = replicas.iter().position(|(name, _, _)| *name == holder).expect("a replica holds the lease");
    let (_, child, _) = replicas.remove(i);
    kill(child);
    let survivor = replicas.pop().expect("one replica left");

    // The survivor takes the lease over (a new epoch) and finishes; the API answers through r0
    // and the survivor all along.
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        for api in [fleet.api(), survivor.2.clone()] {
            let r = http.get(format!("{api}/api/v1/rollouts/{id}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{api} answers while a replica is down");
        }
        let r = fleet.rollout(&id).await.unwrap();
        if r.state != "running" && r.state != "pending" {
            break r;
        }
        assert!(Instant::now() < deadline, "the rollout did not finish without its first driver: {r:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!((done.state.as_str(), done.succeeded, done.failed), ("completed", 6, 0), "{done:?}");
    let l = store.lease(&lease).await.unwrap().unwrap();
    assert_eq!(l.holder, survivor.0, "the survivor drove it to the end");
    assert!(l.epoch > epoch, "the lease changed hands: {l:?}");

    // Every device was offered the bundle once (one accepted event per device, one offer row),
    // and every acknowledgement landed.
    for (device, _) in &fleet.agents {
        let events = fleet.events(device).await.unwrap();
        let accepted = events.iter().filter(|e| e.kind == "install_accepted").count();
        let succeeded = events.iter().filter(|e| e.kind == "install_succeeded").count();
        assert_eq!((accepted, succeeded), (1, 1), "{device}: {events:?}");
    }
    for (device, _) in &fleet.agents {
        let d = fleet.devices().await.unwrap().into_iter().find(|d| &d.id == device).unwrap();
        assert!(d.online && d.models.iter().any(|m| m.name == "digits" && m.version == 1), "{d:?}");
    }
    kill(survivor.1);
    fleet.shutdown().await;
}

/// PostgreSQL away for 30 s in the middle of a staged rollout: the replica says it is unhealthy
/// (503) while the store does not answer, acts on nothing meanwhile, keeps what devices report
/// until the store is back, and the rollout then completes with one install per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_waits_out_a_database_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = start_postgres(&dir.path().join("pg"));
    let store_url = pg.create_database("fleet");
    let opts = FleetOptions { store: Some(store_url), ..FleetOptions::default() };
    let fleet = Fleet::start_with(&dir.path().join("fleet"), 4, opts).await.unwrap();
    let anon = flotilla_demo::client_builder(fleet.server.ca_path().as_deref()).unwrap().build().unwrap();
    let health = |anon: reqwest::Client, api: String| async move {
        let r = anon.get(format!("{api}/api/v1/health")).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().await.unwrap())
    };
    let (status, body) = health(anon.clone(), fleet.api()).await;
    assert_eq!((status, body["store"]["backend"].as_str()), (200, Some("postgres")), "{body}");

    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..1])).unwrap()).await.unwrap();
    let plan = serde_json::json!({"waves": ["1", "100%"], "bake_secs": 2, "gates": ["install_success>=1"]});
    let id = fleet.start_rollout_with("digits@1", plan).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = fleet.rollout(&id).await.unwrap();
        if r.offered + r.succeeded > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the rollout did not start: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pg.stop();
    let down = Instant::now();
    let mut saw_unhealthy = false;
    while down.elapsed() < Duration::from_secs(30) {
        let (status, body) = health(anon.clone(), fleet.api()).await;
        if status == 503 {
            assert_eq!(body["store"]["ok"], false, "{body}");
            saw_unhealthy = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(saw_unhealthy, "the replica never said its store was away");
    pg.start();

    let r = fleet.wait_rollout(&id, Duration::from_secs(120)).await.unwrap();
    assert_eq!((r.state.as_str(), r.succeeded, r.failed), ("completed", 4, 0), "{r:?}");
    assert_eq!(health(anon.clone(), fleet.api()).await.0, 200);
    for (device, _) in &fleet.agents {
        let events = fleet.events(device).await.unwrap();
        let accepted = events.iter().filter(|e| e.kind == "install_accepted").count();
        let succeeded = events.iter().filter(|e| e.kind == "install_succeeded").count();
        assert_eq!((accepted, succeeded), (1, 1), "{device}: {events:?}");
    }
    fleet.shutdown().await;
}
