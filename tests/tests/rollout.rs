//! Staged rollouts on 20 real agents: a good bundle passes every wave (and survives a restart of
//! the control plane in the middle); a bundle that is slower than the version before it is
//! stopped by its latency gate at the first wave and rolled back; a bundle whose self-test fails
//! stops at the first wave; a bundle that passes its self-test but fails on live inputs is
//! stopped by its error-rate gate and rolled back. The devices outside the first wave never
//! receive a bad bundle.
//!
//! The fleet talks through Debian's Mosquitto here, over mutual TLS with the fleet's certificates
//! (`flotilla-server mosquitto` sets it up): restarting the control plane in-process
//! cannot take an embedded broker's sockets down with it the way killing the process does, and a
//! broker that outlives the server is the harder case anyway (the server's persistent session
//! must keep what devices said while it was down).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_api::v1::Rollout;
use flotilla_demo::{Fleet, digits};

const N: usize = 20;
const T: Duration = Duration::from_secs(120);

/// One inference on every device, as the apps on them would keep doing.
async fn traffic(fleet: &Fleet) {
    let samples = digits::samples();
    for (id, _) in &fleet.agents {
        let _ = fleet.infer(id, "digits", &digits::request(&samples[..4])).await;
    }
}

/// Traffic from cameras whose gain is off: pixels up to 2.5 (the good models cope; the faulty
/// one fails every such inference).
async fn hot_traffic(fleet: &Fleet) {
    let hot: Vec<Vec<f32>> =
        digits::baseline_images().into_iter().take(4).map(|i| i.iter().map(|x| x * 2.5).collect()).collect();
    for (id, _) in &fleet.agents {
        let _ = fleet.infer(id, "digits", &digits::images_request(&hot)).await;
    }
}

/// Keep the traffic going until the rollout is neither pending nor running (or `until` says
/// stop early).
async fn drive(fleet: &Fleet, id: &str, mut until: impl FnMut(&Rollout) -> bool) -> Rollout {
    let start = Instant::now();
    loop {
        traffic(fleet).await;
        let r = fleet.rollout(id).await.unwrap();
        if (r.state != "running" && r.state != "pending") || until(&r) {
            return r;
        }
        assert!(start.elapsed() < T, "rollout stuck: {r:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn plan(waves: &str, gates: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "waves": flotilla_rollout::Wave::parse_list(waves).unwrap(),
        "bake_secs": 2,
        "gates": gates.iter().map(|g| flotilla_rollout::Gate::parse(g).unwrap()).collect::<Vec<_>>(),
        "on_failure": "rollback",
        "min_reporting": 1,
    })
}

async fn versions(fleet: &Fleet) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (id, _) in &fleet.agents {
        let m = fleet.model_metadata(id, "digits").await.unwrap();
        out.insert(id.clone(), m.versions[0].parse().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn staged_rollouts_pass_stop_roll_back_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Mosquitto with the fleet's certificates (mutual TLS), set up by `flotilla-server mosquitto`.
    let (_broker, url) = flotilla_tests::start_mosquitto_tls(dir.path(), &dir.path().join("fleet/server"));
    let mut fleet = Fleet::start_with_broker(&dir.path().join("fleet"), N, Some(url)).await.unwrap();
    let samples = digits::samples();
    let golden = || digits::golden(&samples[..2]);

    // v1 everywhere, and a few seconds of traffic so every device reports v1's latency.
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, golden()).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        traffic(&fleet).await;
    }

    // v2 (the same model, rebuilt): three waves, every gate passes; the control plane is
    // restarted once the first wave has passed.
    fleet.push(fleet.bundle("digits", 2, digits::MODEL, golden()).unwrap()).await.unwrap();
    let gates = ["install_success>=1", "error_rate<=0.05", "latency_p95<=3x"];
    let id = fleet.start_rollout_with("digits@2", plan("10%,50%,100%", &gates)).await.unwrap();
    let r = drive(&fleet, &id, |r| r.current_wave >= 2).await;
    assert_eq!((r.state.as_str(), r.current_wave), ("running", 2), "{r:#?}");
    assert_eq!(r.waves[0].status, "passed");
    assert!(r.waves[0].gates.iter().all(|g| g.passed && g.value.is_some()), "{:#?}", r.waves[0].gates);
    assert_eq!(r.waves.iter().map(|w| w.size).sum::<u64>(), N as u64);
    fleet.restart_server().await.unwrap();
    fleet.wait_devices_online(N).await.unwrap();
    let r = drive(&fleet, &id, |_| false).await;
    assert_eq!(r.state, "completed", "{r:#?}");
    assert_eq!((r.succeeded, r.failed, r.devices.len()), (N as u64, 0, N));
    assert_eq!(r.waves.iter().map(|w| w.size).collect::<Vec<_>>(), [2, 8, 10]);
    assert!(versions(&fleet).await.values().all(|&v| v == 2));
    // Each device installed v2 once, restart or not.
    for (dev, _) in &fleet.agents {
        let installs = fleet
            .events(dev)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == "install_succeeded" && e.detail["version"] == 2)
            .count();
        assert_eq!(installs, 1, "{dev}");
    }

    // v3: the wide model, about eight times slower than v2 on the same devices. Its latency
    // gate stops the first wave, whose devices go back to v2; nobody else is offered v3.
    fleet.push(fleet.bundle("digits", 3, digits::MODEL_WIDE, vec![]).unwrap()).await.unwrap();
    let id = fleet.start_rollout_with("digits@3", plan("10%,100%", &["latency_p95<=1.5x"])).await.unwrap();
    let r = drive(&fleet, &id, |_| false).await;
    assert_eq!(r.state, "rolled_back", "{r:#?}");
    assert!(r.reason.as_deref().unwrap().contains("latency_p95"), "{r:?}");
    assert_eq!(r.current_wave, 1);
    assert_eq!(r.devices.len(), 2, "only the first wave was offered v3: {r:#?}");
    let first_wave: Vec<String> = r.devices.iter().map(|d| d.device.clone()).collect();
    fleet.wait_for(T, || async { Ok(versions(&fleet).await.values().all(|&v| v == 2)) }).await.unwrap();
    // Each reports it (through its outbox, so a moment after it happened).
    for dev in &first_wave {
        fleet
            .wait_for(T, || async {
                let events = fleet.events(dev).await?;
                Ok(events.iter().any(|e| e.kind == "model_rolled_back" && e.detail["from_version"] == 3))
            })
            .await
            .unwrap();
    }

    // v4: a latency budget no device can meet, so every self-test fails: the first wave stops
    // the rollout at once, without a bake.
    let mut opts = flotilla_builder::BuildOptions::new("digits", 4, digits::MODEL.to_vec(), flotilla_demo::unix_now());
    opts.golden = golden();
    opts.latency_budget_us = Some(1);
    fleet.push(fleet.build_signed(&opts).unwrap()).await.unwrap();
    let id = fleet.start_rollout_with("digits@4", plan("10%,100%", &["self_test_pass>=1"])).await.unwrap();
    let r = drive(&fleet, &id, |_| false).await;
    assert_eq!(r.state, "rolled_back", "{r:#?}");
    assert!(r.reason.as_deref().unwrap().contains("self_test_pass"), "{r:?}");
    assert_eq!((r.waves[0].size, r.waves[0].failed, r.devices.len()), (2, 2, 2), "{r:#?}");
    assert!(r.devices.iter().all(|d| d.reason.as_deref().unwrap_or("").contains("over the budget")), "{r:#?}");
    assert!(versions(&fleet).await.values().all(|&v| v == 2));

    // v5: computes what v2 does on every image it was tested with, and fails on the images the
    // devices actually see now. Its self-test passes; its error-rate gate stops it.
    let faulty = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/digits_cnn_faulty.onnx"),
    )
    .unwrap();
    fleet.push(fleet.bundle("digits", 5, &faulty, golden()).unwrap()).await.unwrap();
    let id = fleet.start_rollout_with("digits@5", plan("10%,100%", &["error_rate<=0.05"])).await.unwrap();
    let start = Instant::now();
    let r = loop {
        hot_traffic(&fleet).await;
        let r = fleet.rollout(&id).await.unwrap();
        if r.state != "running" && r.state != "pending" {
            break r;
        }
        assert!(start.elapsed() < T, "rollout stuck: {r:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.state, "rolled_back", "{r:#?}");
    assert!(r.reason.as_deref().unwrap().contains("error_rate"), "{r:?}");
    assert_eq!((r.waves[0].succeeded, r.devices.len()), (2, 2), "self-tests passed, nobody else was offered: {r:#?}");
    assert!(r.waves[0].gates[0].value.unwrap() > 0.05, "{r:#?}");
    fleet.wait_for(T, || async { Ok(versions(&fleet).await.values().all(|&v| v == 2)) }).await.unwrap();
    fleet.shutdown().await;
}
