//! Store and forward: what a device has to say while it cannot reach the broker waits in its
//! SQLite outbox and arrives, in order and with its original timestamp, once it reconnects.
//!
//! The case is a real one: the active model's blob is corrupted on disk while the agent is down,
//! and the agent starts with the broker unreachable. Recovery rolls back to the previous
//! version (durably) and reports it; the report reaches the control plane after the network
//! comes back.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_demo::{Fleet, FleetOptions, digits};
use flotilla_tests::Proxy;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_while_offline_is_reported_after_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_with(dir.path(), 0, FleetOptions::default()).await.unwrap();
    let proxy = Proxy::start(fleet.server.mqtt_addr).await.unwrap();
    let mut cfg = fleet.agent_config("dev-0").await;
    cfg.broker.port = proxy.addr.port();
    fleet.start_agent_with(cfg.clone()).await.unwrap();
    fleet.wait_devices_online(1).await.unwrap();
    let samples = digits::samples();
    for (version, model) in [(1, digits::MODEL), (2, digits::MODEL_INT8)] {
        fleet.push(fleet.bundle("digits", version, model, digits::golden(&samples[..2])).unwrap()).await.unwrap();
        let r = fleet.wait_rollout(&fleet.start_rollout(&format!("digits@{version}")).await.unwrap(), T).await;
        assert_eq!(r.unwrap().state, "completed");
    }

    // Down: v2's model blob rots on disk, and the broker is out of reach when the agent restarts.
    fleet.kill_agent("dev-0").await;
    let blobs = dir.path().join("agents/dev-0/blobs/sha256");
    let v2_blob = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read(p).unwrap() == digits::MODEL_INT8)
        .expect("v2's model blob");
    let mut bytes = std::fs::read(&v2_blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&v2_blob, bytes).unwrap();
    proxy.retarget(SocketAddr::from(([127, 0, 0, 1], 1)));
    fleet.start_agent_with(cfg).await.unwrap();

    // Offline, the device already serves v1 again, and the control plane has heard nothing.
    let resp = fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(resp.model_version, "1");
    assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rolled_back = |events: &[flotilla_api::v1::Event]| events.iter().any(|e| e.kind == "model_rolled_back");
    assert!(!rolled_back(&fleet.events("dev-0").await.unwrap()));

    // Back online: the queued report arrives with the time it was made, not the time it was sent.
    let reconnected_at = time::OffsetDateTime::now_utc();
    proxy.retarget(fleet.server.mqtt_addr);
    fleet.wait_for(T, || async { Ok(rolled_back(&fleet.events("dev-0").await?)) }).await.unwrap();
    let events = fleet.events("dev-0").await.unwrap();
    let e = events.iter().find(|e| e.kind == "model_rolled_back").unwrap();
    assert_eq!((e.detail["from_version"].as_u64(), e.detail["to_version"].as_u64()), (Some(2), Some(1)), "{e:?}");
    assert!(e.detail["reason"].as_str().unwrap().contains("corrupt on disk"), "{e:?}");
    let at = time::OffsetDateTime::parse(&e.at, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(at.unix_timestamp() < reconnected_at.unix_timestamp(), "{} is not before {reconnected_at}", e.at);
    // The server also learns from the device's state that v1 runs.
    fleet
        .wait_for(T, || async {
            let devices = fleet.devices().await?;
            Ok(devices[0].models.iter().any(|m| m.name == "digits" && m.version == 1))
        })
        .await
        .unwrap();
    fleet.shutdown().await;
}
