//! Live interruptions on both transports: a connection cut mid-bundle and an agent killed
//! mid-bundle. Each case ends with the bundle installed and serving, and with the server having
//! sent no byte twice beyond one chunk (the chunk in flight when the transfer broke).
//!
//! The cuts are real: a TCP proxy on the loopback sits between the agent and the server's HTTP
//! port or the broker, throttles it so the interruption lands mid-bundle, and closes the
//! connection after a given number of bytes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flotilla_demo::{Fleet, FleetOptions, digits};
use flotilla_tests::Proxy;

/// Small chunks make the fixture bundle span many of them.
const CHUNK: u32 = 1024;
const TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    Http,
    Mqtt,
}

#[derive(Clone, Copy, Debug)]
enum Break {
    /// Close the connection after this share of the bundle passed.
    Cut,
    /// Kill the agent once this share of the bundle is in its staging file, then start it again.
    Restart,
}

struct Outcome {
    size: u64,
    served_http: u64,
    served_mqtt: u64,
    cuts: u64,
}

async fn interrupted_install(transport: Transport, brk: Break) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    // The proxy starts first: its address goes into the offers (HTTP) or the agent's config (MQTT).
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 1))).await.unwrap();
    let public_url = match transport {
        Transport::Http => format!("https://{}", proxy.addr),
        // Nothing listens on port 1: HTTP is refused at once and the agent uses MQTT chunks.
        Transport::Mqtt => "https://127.0.0.1:1".to_string(),
    };
    let opts = FleetOptions { public_url: Some(public_url), chunk_size: Some(CHUNK), ..FleetOptions::default() };
    let mut fleet = Fleet::start_with(dir.path(), 0, opts).await.unwrap();
    let mut cfg = fleet.agent_config("dev-0").await;
    match transport {
        Transport::Http => proxy.retarget(fleet.server.http_addr),
        Transport::Mqtt => {
            proxy.retarget(fleet.server.mqtt_addr);
            cfg.broker.port = proxy.addr.port();
        }
    }
    fleet.start_agent_with(cfg.clone()).await.unwrap();
    fleet.wait_devices_online(1).await.unwrap();

    let samples = digits::samples();
    let bundle = fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples)).unwrap();
    let size = bundle.len() as u64;
    assert!(size > 8 * CHUNK as u64, "the fixture spans many chunks ({size} bytes)");
    fleet.push(bundle).await.unwrap();
    // About two seconds for the whole bundle, so the break lands mid-transfer.
    proxy.throttle(size / 2);
    match brk {
        Break::Cut => proxy.cut_after(size * 4 / 10),
        Break::Restart => {}
    }
    let rollout = fleet.start_rollout("digits@1").await.unwrap();
    if let Break::Restart = brk {
        let staging = dir.path().join("agents/dev-0/staging");
        wait_until(TIMEOUT, || staged_bytes(&staging) >= size * 4 / 10).await;
        fleet.kill_agent("dev-0").await;
        let staged = staged_bytes(&staging);
        assert!(staged > 0 && staged < size, "killed mid-bundle ({staged} of {size} bytes staged)");
        proxy.throttle(0);
        fleet.start_agent_with(cfg).await.unwrap();
    }

    let r = fleet.wait_rollout(&rollout, TIMEOUT).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    let resp = fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    let shared = fleet.server.shared();
    let out = Outcome {
        size,
        served_http: shared.metrics.served_http.load(Ordering::Relaxed),
        served_mqtt: shared.metrics.served_mqtt.load(Ordering::Relaxed),
        cuts: proxy.cuts(),
    };
    fleet.shutdown().await;
    out
}

fn staged_bytes(staging: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(staging) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Everything was served once, plus at most the one chunk in flight at the break.
fn assert_served_once(o: &Outcome, transport: Transport) {
    eprintln!(
        "{transport:?}: bundle {} bytes, served over HTTP {}, over MQTT {}, cuts {}",
        o.size, o.served_http, o.served_mqtt, o.cuts
    );
    let (on, off) = match transport {
        Transport::Http => (o.served_http, o.served_mqtt),
        Transport::Mqtt => (o.served_mqtt, o.served_http),
    };
    assert_eq!(off, 0, "the other transport was not used");
    assert!(on >= o.size, "served {on} of {} bytes", o.size);
    assert!(
        on <= o.size + CHUNK as u64,
        "served {on} bytes for a {}-byte bundle: {} fetched twice, more than one {CHUNK}-byte chunk",
        o.size,
        on - o.size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_connection_cut_mid_bundle_resumes() {
    let o = interrupted_install(Transport::Http, Break::Cut).await;
    assert_eq!(o.cuts, 1);
    assert_served_once(&o, Transport::Http);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_connection_cut_mid_bundle_resumes() {
    let o = interrupted_install(Transport::Mqtt, Break::Cut).await;
    assert_eq!(o.cuts, 1);
    assert_served_once(&o, Transport::Mqtt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_killed_mid_http_download_resumes_after_restart() {
    let o = interrupted_install(Transport::Http, Break::Restart).await;
    assert_served_once(&o, Transport::Http);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_killed_mid_mqtt_download_resumes_after_restart() {
    let o = interrupted_install(Transport::Mqtt, Break::Restart).await;
    assert_served_once(&o, Transport::Mqtt);
}
