//! Resumable transfer on both transports: a download interrupted earlier (half the bundle is
//! already in the agent's staging file) resumes from there; nothing already on disk is fetched
//! again. When HTTP cannot be reached the agent continues over MQTT from the same file.

use std::sync::atomic::Ordering;
use std::time::Duration;

use flotilla_demo::{Fleet, FleetOptions, digits};

async fn resume_case(opts: FleetOptions) -> (u64, u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start_with(dir.path(), 1, opts).await.unwrap();
    let samples = digits::samples();
    // Golden cases make the bundle a few chunks' worth of bytes at a small chunk size too.
    let bundle = fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples)).unwrap();
    let pushed = fleet.push(bundle.clone()).await.unwrap();
    let half = bundle.len() / 2;
    let staging = dir.path().join("agents/dev-0/staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join(format!("{}.part", pushed.id)), &bundle[..half]).unwrap();

    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    let resp = fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    assert!(!staging.join(format!("{}.part", pushed.id)).exists(), "the staging file is removed after install");
    let shared = fleet.server.shared();
    let out = (
        bundle.len() as u64,
        half as u64,
        shared.metrics.served_http.load(Ordering::Relaxed),
        shared.metrics.served_mqtt.load(Ordering::Relaxed),
    );
    fleet.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_download_resumes_from_the_staged_bytes() {
    let (size, half, http, mqtt) = resume_case(FleetOptions::default()).await;
    assert_eq!(http, size - half, "HTTP served exactly the missing bytes");
    assert_eq!(mqtt, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_http_falls_back_to_mqtt_chunks_and_still_resumes() {
    // Nothing listens on port 1 of the loopback: the HTTP attempt is refused at once.
    let opts = FleetOptions { public_url: Some("https://127.0.0.1:1".into()), ..FleetOptions::default() };
    let (size, half, http, mqtt) = resume_case(opts).await;
    assert_eq!(http, 0);
    assert_eq!(mqtt, size - half, "MQTT served exactly the missing bytes");
}

/// Before downloading, the agent checks the disk holding its data directory for the download,
/// the unpacked content and its reserve. Short of that it refuses with a clear reason, fetches
/// nothing, and keeps its model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_is_a_clear_refusal_before_any_byte_is_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_with(dir.path(), 0, FleetOptions::default()).await.unwrap();
    let mut cfg = fleet.agent_config("dev-0").await;
    // A reserve no disk can meet stands in for a full disk: the check is the real statvfs.
    cfg.disk_reserve_bytes = u64::MAX / 4;
    fleet.start_agent_with(cfg).await.unwrap();
    fleet.wait_devices_online(1).await.unwrap();
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..2])).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    let reason = r.devices[0].reason.clone().unwrap_or_default();
    assert!(reason.starts_with("offered:") && reason.contains("not enough disk space"), "{reason}");
    let shared = fleet.server.shared();
    assert_eq!(
        shared.metrics.served_http.load(Ordering::Relaxed) + shared.metrics.served_mqtt.load(Ordering::Relaxed),
        0
    );
    assert!(!dir.path().join("agents/dev-0/staging").exists(), "nothing was staged");
    fleet.shutdown().await;
}
