//! Interoperability: the control plane and agents speak plain MQTT 3.1.1, so Debian's
//! Mosquitto can replace the embedded broker (`flotilla-server --broker mqtt://HOST:PORT`).
//! `.ci/run` installs mosquitto; without it this test fails and says so.

use std::time::Duration;

use flotilla_demo::{Fleet, digits};
use flotilla_tests::start_mosquitto;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_over_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_mosquitto(dir.path());
    let fleet =
        Fleet::start_with_broker(&dir.path().join("fleet"), 2, Some(format!("mqtt://127.0.0.1:{}", broker.port)))
            .await
            .unwrap();
    assert_eq!(fleet.server.mqtt_addr.port(), broker.port);
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..2])).unwrap()).await.unwrap();
    let id = fleet.start_rollout("digits@1").await.unwrap();
    let r = fleet.wait_rollout(&id, Duration::from_secs(60)).await.unwrap();
    assert_eq!((r.state.as_str(), r.succeeded), ("completed", 2), "{r:?}");
    for (device, _) in &fleet.agents {
        let resp = fleet.infer(device, "digits", &digits::request(&samples)).await.unwrap();
        assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    }
    fleet.shutdown().await;
}
